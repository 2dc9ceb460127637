"""Signed results to a LIS (issue 21): HL7 ORU^R01 files, MLLP delivery, a FHIR bundle.

One real small run with the tiny colour model (tests/tinymodel.py), reviewed and verified
with --hl7 and --fhir; the messages are parsed back with hl7apy's strict validation and
compared with the verified workbook patient by patient. MLLP goes to a listener this test
starts on 127.0.0.1, every wait bounded by a one-second ACK time-out.
"""
from __future__ import annotations

import json
import socket
import socketserver
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

pytest.importorskip("hl7apy")
pytest.importorskip("fhir.resources")

import tinymodel  # noqa: E402
from batchwbc.core import catalogue
from batchwbc.ops import exit_codes
from batchwbc.outputs import workbook  # noqa: E402
from batchwbc.cli import main  # noqa: E402
from batchwbc.core.config import ConfigError, settings_from_dict  # noqa: E402
from batchwbc.outputs.lis import fhir, hl7, mllp  # noqa: E402

HOSTILE = 'P|1^"q"~\\&\'x 漢é'  # HL7 delimiters, quotes, the escape character, unicode
NEWLINE = "P3\nline"  # a line break in a folder name
SIGNER = 'Dr. O"Brien |^~\\& 漢'
SLIDES = {
    HOSTILE: ["lymphocyte"] * 4 + ["myeloblast", "erythroblast"],
    "P2": ["neutrophil_segmented"] * 3 + ["eosinophil"],
    NEWLINE: ["monocyte"] * 2,
    "UNSIGNED": ["lymphocyte"] * 2,
}
INTERP = {"above": "H", "below": "L", "within": "N", "": ""}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _slides(base: Path) -> tuple[Path, Path]:
    """The tiny model and one folder of single-colour crops per patient of SLIDES."""
    model = tinymodel.build(base / "tiny.onnx")
    slides = base / "slides"
    for patient, classes in SLIDES.items():
        for i, cid in enumerate(classes):
            (slides / patient).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(slides / patient / f"c{i}.png"),
                        np.full((40, 40, 3), tinymodel.colour_for(cid)[::-1], np.uint8))
    return model, slides


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """A reviewed report (three patients signed, one not) verified with --hl7 and --fhir."""
    base = tmp_path_factory.mktemp("lis")
    model, slides = _slides(base)
    rep = base / "report.xlsx"
    r = invoke("run", slides, "--out", rep, "--model", model, "--workers", "0")
    assert r.exit_code == exit_codes.OK, r.stderr
    wb = load_workbook(rep)
    ws = wb["Summary"]
    header = [c.value for c in ws[workbook.HEADER_ROWS["Summary"]]]
    col = header.index("Verified by")
    for row in ws.iter_rows(min_row=workbook.HEADER_ROWS["Summary"] + 1):
        if row[0].value != "UNSIGNED":
            row[col].value = SIGNER
    wb.save(rep)
    out, hl7_dir, bundle = base / "verified.xlsx", base / "hl7", base / "bundle.json"
    r = invoke("verify", rep, "--out", out, "--hl7", hl7_dir, "--fhir", bundle)
    assert r.exit_code == exit_codes.OK, r.stderr
    return rep, out, hl7_dir, bundle


def _sheet(path: Path, name: str) -> list[dict]:
    ws = load_workbook(path)[name]
    rows = list(ws.iter_rows(min_row=workbook.HEADER_ROWS[name], values_only=True))
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def _messages(folder: Path) -> dict[str, object]:
    out = {}
    for f in sorted(folder.glob("*.hl7")):
        msg = hl7.parse(f.read_bytes().decode("utf-8").rstrip("\r"))  # strict: raises on any error
        out[hl7.text_of(msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1)] = msg
    return out


def test_one_strictly_valid_message_per_signed_patient_with_the_verified_values(verified):
    _, out, hl7_dir, _ = verified
    msgs = _messages(hl7_dir)
    assert set(msgs) == {HOSTILE, "P2", NEWLINE}  # hostile names round-trip; UNSIGNED is not sent
    summary = {r["Patient"]: r for r in _sheet(out, "Summary")}
    diff = _sheet(out, "Differential")
    for patient, msg in msgs.items():
        oo = msg.oru_r01_patient_result.oru_r01_order_observation
        sent = {}
        for group in oo.oru_r01_observation:
            obx = group.obx
            assert hl7.text_of(obx.obx_11) == "F"
            assert hl7.text_of(obx.obx_16.xcn_2) == summary[patient]["Verified by"] == " ".join(SIGNER.split())
            sent[hl7.text_of(obx.obx_3.ce_1)] = obx
        for row in (r for r in diff if r["Patient"] == patient and catalogue.get(r["Class id"]).counts_in_wbc):
            obx = sent[{"neutrophil_segmented": "769-0", "neutrophil_band": "764-1", "lymphocyte": "737-7",
                        "monocyte": "744-3", "eosinophil": "714-6", "basophil": "707-0", "myeloblast": "709-6",
                        "promyelocyte": "783-1", "myelocyte": "749-2", "metamyelocyte": "740-1"}[row["Class id"]]]
            assert float(hl7.text_of(obx.obx_5)) == round(row["Verified % of WBC"], 1)
            interpretation = hl7.text_of(obx.obx_8) if obx.obx_8.to_er7() else ""
            assert interpretation == INTERP[row["vs. reference"] or ""]
            assert hl7.text_of(obx.obx_6.ce_1) == "%"
        nrbc = summary[patient]["NRBC /100 WBC verified"]
        assert float(hl7.text_of(sent["18309-5"].obx_5)) == round(nrbc, 1)
        codes = [hl7.text_of(n.nte_3).split(":")[0] for n in oo.nte] if oo.nte else []
        assert "; ".join(codes) == (summary[patient]["Flag codes (verified)"] or "")
        assert hl7.text_of(sent["UNCLASSIFIED"].obx_5) == str(summary[patient]["Unclassified verified"])


def test_unsigned_patients_are_listed_in_the_run_sheet(verified):
    run = {r["Item"]: r["Value"] for r in _sheet(verified[1], "Run")}
    assert run["Verification: LIS not sent (not signed)"] == "UNSIGNED"
    assert run["Verification: LIS HL7 messages"].startswith("3 signed patients")


def test_fhir_bundle_validates_resource_by_resource_and_references_resolve(verified):
    bundle = json.loads(verified[3].read_text(encoding="utf-8"))
    fhir.validate(bundle)  # each resource with its R4B model, references inside the bundle
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("DiagnosticReport") == 3 and kinds.count("Patient") == 3
    ids = {e["resource"]["identifier"][0]["value"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"}
    assert ids == {HOSTILE, "P2", NEWLINE}
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "DiagnosticReport":
            assert r["status"] == "final" and by_url[r["performer"][0]["reference"]]["name"][0]["text"] == " ".join(SIGNER.split())
            panel = by_url[r["result"][0]["reference"]]
            members = [by_url[m["reference"]] for m in panel["hasMember"]]
            assert all(m["code"]["coding"][0]["system"] in ("http://loinc.org", "urn:batchwbc:local-codes") for m in members)
    broken = dict(bundle, entry=bundle["entry"][1:])  # the Device is gone: references dangle
    with pytest.raises(Exception, match="not in the bundle"):
        fhir.validate(broken)


# ---------------------------------------------------------------- MLLP against a real listener

class Listener:
    """A small MLLP server on 127.0.0.1: answers AA, AE, or never (mode), and counts messages."""

    def __init__(self, mode: str):
        self.mode, self.received = mode, []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                buf = b""
                while mllp.END not in buf:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                text = buf[1:buf.find(mllp.END)].decode()
                outer.received.append(text)
                if outer.mode == "hang":
                    threading.Event().wait(3)
                    return
                cid = text.split("\r")[0].split("|")[9]
                ack = (f"MSH|^~\\&|LIS||batchwbc||20240101120000||ACK^R01^ACK|A{len(outer.received)}|P|2.5.1\r"
                       f"MSA|{outer.mode}|{cid}|{'duplicate' if outer.mode == 'AE' else ''}")
                self.request.sendall(mllp.START + ack.encode() + mllp.END)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lis_run(verified, tmp_path):
    """verify again into a fresh --hl7 folder, with a one-second ACK time-out."""
    cfg = tmp_path / "lis.toml"
    cfg.write_text("[lis]\nack_timeout_s = 1.0\n", encoding="utf-8")

    def run(address: str, folder: Path | None = None):
        folder = folder or tmp_path / "hl7"
        r = invoke("verify", verified[0], "--out", tmp_path / "v.xlsx", "--hl7", folder, "--mllp", address,
                   "--config", cfg)
        return r, folder
    return run


def test_acknowledged_messages_are_recorded_and_a_resend_sends_nothing_twice(lis_run):
    lis = Listener("AA")
    try:
        r, folder = lis_run(lis.address)
        assert r.exit_code == exit_codes.OK, r.stderr
        assert len(lis.received) == 3 and len(mllp.acknowledged(folder)) == 3
        r, _ = lis_run(lis.address, folder)  # the same report, the same folder: nothing new
        assert r.exit_code == exit_codes.OK and len(lis.received) == 3
        assert "already acknowledged" in r.stderr
    finally:
        lis.close()


@pytest.mark.parametrize("mode, reason", [("AE", "answered AE (duplicate)"), ("hang", "time-out")])
def test_a_message_not_acknowledged_stays_with_its_reason_and_exit_5(lis_run, mode, reason):
    lis = Listener(mode)
    try:
        r, folder = lis_run(lis.address)
    finally:
        lis.close()
    assert r.exit_code == exit_codes.NOT_DELIVERED
    assert reason in r.stderr and "Traceback" not in r.stderr
    assert len(list(folder.glob("*.hl7"))) == 3 and not mllp.acknowledged(folder)


def test_no_listener_is_a_refused_connection_then_a_resend_delivers(lis_run):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r, folder = lis_run(f"127.0.0.1:{port}")
    assert r.exit_code == exit_codes.NOT_DELIVERED and "refused" in r.stderr
    lis = Listener("AA")
    try:
        r, _ = lis_run(lis.address, folder)
    finally:
        lis.close()
    assert r.exit_code == exit_codes.OK and len(lis.received) == 3


# ---------------------------------------------------------------- escaping, config, options

@pytest.mark.parametrize("text", ["plain", "a|b^c~d\\e&f", "\\F\\ already escaped?", "line\nbreak\r", "漢é\"'"])
def test_escape_round_trips(text):
    assert hl7.unescape(hl7.escape(text)) == text
    assert not any(c in hl7.escape(text) for c in "|^~&\r\n")


def test_lis_config_is_validated_at_start():
    s = settings_from_dict({"lis": {"identifier_field": "OBR-2",
                                    "codes": {"smudge": {"code": "SM", "display": "Smudge", "system": "99LAB",
                                                         "uri": "urn:lab"}}}})
    assert s.lis.identifier_field == "OBR-2" and s.lis.code("smudge").code == "SM"
    assert s.lis.code("lymphocyte").code == "737-7"  # the rows not named keep their defaults
    for bad, words in [({"identifier_field": "PID-9"}, "one of PID-3"), ({"codes": {"nope": {}}}, "unknown key"),
                       ({"codes": {"smudge": {"code": "X", "display": "d", "system": "99L"}}}, "uri is needed"),
                       ({"sending_facility": "A|B"}, "delimiters"), ({"ack_timeout_s": 0}, "above 0")]:
        with pytest.raises(ConfigError, match=words):
            settings_from_dict({"lis": bad})


def test_mllp_needs_hl7_and_a_missing_extra_names_it(verified, tmp_path, monkeypatch):
    r = invoke("verify", verified[0], "--out", tmp_path / "v.xlsx", "--mllp", "127.0.0.1:1")
    assert r.exit_code == exit_codes.USAGE and "--hl7" in r.stderr
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "hl7apy" else real(n, *a))
    r = invoke("verify", verified[0], "--out", tmp_path / "v.xlsx", "--hl7", tmp_path / "h")
    assert r.exit_code == exit_codes.USAGE and "batchwbc[lis]" in r.stderr
    assert not (tmp_path / "v.xlsx").exists()


# ---------------------------------------------------------------- preliminary results from `run` ([lis] send_preliminary)

CODE_OF = {"neutrophil_segmented": "769-0", "lymphocyte": "737-7", "monocyte": "744-3", "eosinophil": "714-6",
           "myeloblast": "709-6"}


@pytest.fixture
def prelim(tmp_path):
    """Slides, the tiny model and a config that opts in to preliminary results (1 s ACK time-out)."""
    model, slides = _slides(tmp_path)
    cfg = tmp_path / "prelim.toml"
    cfg.write_text("[lis]\nsend_preliminary = true\nack_timeout_s = 1.0\n", encoding="utf-8")

    def run(*extra):
        return invoke("run", slides, "--out", tmp_path / "report.xlsx", "--model", model, "--workers", "0", *extra)
    return run, cfg, tmp_path


def test_run_sends_nothing_and_refuses_hl7_without_the_config_opt_in(prelim, tmp_path):
    run, _, base = prelim
    plain = base / "plain.toml"
    plain.write_text("[lis]\nack_timeout_s = 1.0\n", encoding="utf-8")
    for extra in (("--hl7", base / "hl7"), ("--hl7", base / "hl7", "--config", plain), ("--mllp", "127.0.0.1:1")):
        r = run(*extra)
        assert r.exit_code == exit_codes.USAGE
        assert "send_preliminary = true in its [lis] table" in r.stderr and "Traceback" not in r.stderr
        assert not (base / "report.xlsx").exists() and not (base / "hl7").exists()
    r = run()  # no option, no opt-in: a plain run, no LIS row
    assert r.exit_code == exit_codes.OK
    assert not any("LIS" in str(k) for k in {r["Item"] for r in _sheet(base / "report.xlsx", "Run")})


def test_preliminary_messages_carry_status_p_the_banner_and_the_summary_values(prelim):
    run, cfg, base = prelim
    lis = Listener("AA")
    try:
        r = run("--config", cfg, "--hl7", base / "hl7", "--mllp", lis.address)
        assert r.exit_code == exit_codes.OK, r.stderr
        assert len(lis.received) == len(SLIDES) and len(mllp.acknowledged(base / "hl7")) == len(SLIDES)
        r = run("--config", cfg, "--hl7", base / "hl7", "--mllp", lis.address)  # the same night again
        assert r.exit_code == exit_codes.OK and len(lis.received) == len(SLIDES)
        assert "already acknowledged" in r.stderr
    finally:
        lis.close()
    msgs = _messages(base / "hl7")
    assert set(msgs) == set(SLIDES)  # every patient, unsigned by definition
    assert all("-prelim-" in f.name for f in (base / "hl7").glob("*.hl7"))
    summary = {row["Patient"]: row for row in _sheet(base / "report.xlsx", "Summary")}
    diff = _sheet(base / "report.xlsx", "Differential")
    for patient, msg in msgs.items():
        oo = msg.oru_r01_patient_result.oru_r01_order_observation
        assert hl7.text_of(oo.obr.obr_25) == "P"
        notes = [hl7.text_of(n.nte_3) for n in oo.nte]
        assert notes[0] == workbook.BANNER  # the Summary sheet's banner wording, first
        flags = [n.split(":")[0] for n in notes[1:]]
        assert "; ".join(flags) == (summary[patient]["Flag codes"] or "")
        sent = {}
        for group in oo.oru_r01_observation:
            assert hl7.text_of(group.obx.obx_11) == "P" and not group.obx.obx_16.to_er7()  # nobody signed
            sent[hl7.text_of(group.obx.obx_3.ce_1)] = group.obx
        for row in (r for r in diff if r["Patient"] == patient and r["Class id"] in CODE_OF and r["% of WBC"] is not None):
            assert float(hl7.text_of(sent[CODE_OF[row["Class id"]]].obx_5)) == round(row["% of WBC"], 1)
        assert float(hl7.text_of(sent["18309-5"].obx_5)) == round(summary[patient]["NRBC /100 WBC"], 1)
        assert hl7.text_of(sent["UNCLASSIFIED"].obx_5) == str(summary[patient]["Unclassified"])
    rows = {row["Item"]: row["Value"] for row in _sheet(base / "report.xlsx", "Run")}
    assert rows["LIS preliminary results (status P)"].startswith(f"{len(SLIDES)} patients, ORU^R01")
    assert rows["LIS preliminary not sent (message could not be built)"] == "none"


def test_the_final_result_after_a_preliminary_one_is_a_distinct_message(prelim):
    run, cfg, base = prelim
    folder = base / "hl7"
    lis = Listener("AA")
    try:
        assert run("--config", cfg, "--hl7", folder, "--mllp", lis.address).exit_code == exit_codes.OK
        prelim_ids = mllp.acknowledged(folder)
        wb = load_workbook(base / "report.xlsx")  # a person signs every patient, changing nothing
        ws = wb["Summary"]
        col = [c.value for c in ws[workbook.HEADER_ROWS["Summary"]]].index("Verified by")
        for row in ws.iter_rows(min_row=workbook.HEADER_ROWS["Summary"] + 1):
            row[col].value = "Tech"
        wb.save(base / "report.xlsx")
        r = invoke("verify", base / "report.xlsx", "--out", base / "v.xlsx", "--hl7", folder, "--mllp", lis.address,
                   "--config", cfg)
        assert r.exit_code == exit_codes.OK, r.stderr
        assert "already acknowledged" not in r.stderr
    finally:
        lis.close()
    final_ids = mllp.acknowledged(folder) - prelim_ids
    assert len(prelim_ids) == len(final_ids) == len(SLIDES) and len(lis.received) == 2 * len(SLIDES)
    for text in lis.received[len(SLIDES):]:
        msg = hl7.parse(text)
        assert hl7.text_of(msg.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25) == "F"


def test_preliminary_not_acknowledged_is_exit_5_with_the_report_written(prelim):
    run, cfg, base = prelim
    lis = Listener("AE")
    try:
        r = run("--config", cfg, "--hl7", base / "hl7", "--mllp", lis.address)
    finally:
        lis.close()
    assert r.exit_code == exit_codes.NOT_DELIVERED and "answered AE (duplicate)" in r.stderr
    assert (base / "report.xlsx").is_file() and len(list((base / "hl7").glob("*.hl7"))) == len(SLIDES)
    assert not mllp.acknowledged(base / "hl7")


def test_send_preliminary_must_be_a_boolean():
    assert settings_from_dict({"lis": {"send_preliminary": True}}).lis.send_preliminary is True
    assert settings_from_dict({}).lis.send_preliminary is False
    with pytest.raises(ConfigError, match="true or false"):
        settings_from_dict({"lis": {"send_preliminary": "yes"}})


# ---------------------------------------------------------------- LOINC provenance (docs/lis.md "Codes")

#: Long common names the lead confirmed in public copies of the LOINC table (docs/lis.md); the
#: default `display` must be exactly these, so a LIS that checks code against name accepts them.
CONFIRMED_LOINC = {
    "neutrophil_segmented": ("769-0", "Neutrophils.segmented/100 leukocytes in Blood by Manual count"),
    "neutrophil_band": ("764-1", "Neutrophils.band form/100 leukocytes in Blood by Manual count"),
    "lymphocyte": ("737-7", "Lymphocytes/100 leukocytes in Blood by Manual count"),
    "monocyte": ("744-3", "Monocytes/100 leukocytes in Blood by Manual count"),
    "eosinophil": ("714-6", "Eosinophils/100 leukocytes in Blood by Manual count"),
    "basophil": ("707-0", "Basophils/100 leukocytes in Blood by Manual count"),
    "myeloblast": ("709-6", "Blasts/100 leukocytes in Blood by Manual count"),
    "myelocyte": ("749-2", "Myelocytes/100 leukocytes in Blood by Manual count"),
    "metamyelocyte": ("740-1", "Metamyelocytes/100 leukocytes in Blood by Manual count"),
}
TO_CONFIRM = {"promyelocyte": "783-1", "nrbc_per_100_wbc": "18309-5"}
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_default_displays_are_the_confirmed_loinc_long_names_and_the_rest_is_marked():
    from batchwbc.core.config import DEFAULT_LIS_CODES

    for key, (code, name) in CONFIRMED_LOINC.items():
        assert (DEFAULT_LIS_CODES[key].code, DEFAULT_LIS_CODES[key].display) == (code, name), key
    rows = {line.split("|")[1].strip(): line for line in (DOCS / "lis.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and line.count("|") >= 6}
    example = (DOCS / "config-example.toml").read_text(encoding="utf-8")
    for key, code in TO_CONFIRM.items():
        assert DEFAULT_LIS_CODES[key].code == code
        assert "to confirm on loinc.org before go-live" in rows[key], key
        block = example.split(f"[lis.codes.{key}]")[0].rsplit("\n\n", 1)[-1]  # the comment above the table
        assert "to confirm on loinc.org before go-live" in block, key
    for key, (code, name) in CONFIRMED_LOINC.items():
        assert f"| {code} | {name} | confirmed |" in rows[key], key
