"""Send HL7 messages over MLLP and read the ACK; record what was acknowledged so nothing is sent twice.

MLLP (HL7 v2 transport): <VT> message <FS><CR> over TCP, answered by an ACK message whose
MSA-1 is AA/CA (accepted) or AE/AR/CE/CR (error, rejected) and whose MSA-2 names our MSH-10.
hl7apy has an MLLP server but no client; this is the client, on the standard library's
sockets with a time-out on connecting and on every read, so a LIS that hangs cannot hang
the verification. The ledger (DIR/delivered.tsv) lists each acknowledged control id; a
message whose id is listed is not sent again (its id is a hash of its content, hl7.control_id).
"""
from __future__ import annotations

import csv
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

START, END = b"\x0b", b"\x1c\x0d"
LEDGER = "delivered.tsv"
ACCEPTED = ("AA", "CA")


class DeliveryError(Exception):
    """A message that was not acknowledged; str(exc) is the reason in one sentence."""


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    text: str  # MSA-3 (or ERR), may be empty


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets); raises ValueError with one sentence."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--mllp must be HOST:PORT with a port from 1 to 65535, not {text!r}.")
    return host, int(port)


def read_ack(raw: bytes, control_id: str) -> Ack:
    """The ACK's MSA-1 and MSA-3, checked against the control id sent."""
    from batchwbc.outputs.lis.hl7 import text_of
    from hl7apy.parser import parse_message

    try:
        ack = parse_message(raw.decode("utf-8", errors="replace").strip("\r\n"), find_groups=False)
        msa = ack.msa
        code = text_of(msa.msa_1)
        acked = text_of(msa.msa_2)
    except Exception as exc:  # noqa: BLE001 - whatever a LIS sends back, one sentence
        raise DeliveryError(f"the answer is not an HL7 ACK ({type(exc).__name__}: {exc})") from None
    if acked != control_id:
        raise DeliveryError(f"the ACK acknowledges message {acked!r}, not {control_id!r}")
    text = msa.msa_3.to_er7() if msa.msa_3 else ""
    return Ack(code, text)


def send(host: str, port: int, er7: str, control_id: str, timeout: float) -> Ack:
    """Send one message and wait for its ACK; DeliveryError unless MSA-1 is AA or CA."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(START + er7.encode("utf-8") + END)
            buf = b""
            while END not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise DeliveryError("the LIS closed the connection without an ACK")
                buf += chunk
    except socket.timeout:
        raise DeliveryError(f"no ACK within {timeout:g} s (time-out)") from None
    except ConnectionRefusedError:
        raise DeliveryError(f"connection to {host}:{port} refused (no listener)") from None
    except OSError as exc:
        raise DeliveryError(f"connection to {host}:{port} failed ({exc.strerror or exc})") from None
    ack = read_ack(buf[buf.find(START) + 1:buf.find(END)], control_id)
    if ack.code not in ACCEPTED:
        raise DeliveryError(f"the LIS answered {ack.code}" + (f" ({ack.text})" if ack.text else ""))
    return ack


def acknowledged(folder: Path) -> set[str]:
    """Control ids the ledger in `folder` lists as acknowledged."""
    path = folder / LEDGER
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as fh:
        return {row[0] for row in csv.reader(fh, delimiter="\t") if row and not row[0].startswith("#")}


def record(folder: Path, control_id: str, file_name: str, ack: Ack, at: datetime) -> None:
    """Append one acknowledged message to the ledger, flushed to disk before the next is sent."""
    path = folder / LEDGER
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        if new:
            fh.write("# control id\tfile\tACK\tacknowledged at\n")
        csv.writer(fh, delimiter="\t").writerow([control_id, file_name, ack.code, at.isoformat(timespec="seconds")])
        fh.flush()
        os.fsync(fh.fileno())
