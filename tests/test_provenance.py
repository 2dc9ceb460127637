"""The Run sheet's provenance rows: config file + hash, host, user, command line, versions."""
import hashlib
import platform

from batchwbc.ops.provenance import command_line, file_sha256, provenance_rows


def test_rows_name_the_config_its_hash_and_the_environment(tmp_path):
    cfg = tmp_path / "lab config.toml"
    cfg.write_text("[flags]\nblasts_high_pct = 10\n")
    rows = provenance_rows(cfg, ["batchwbc", "run", "/slides/night 1", "--out", "r.xlsx"])
    assert rows["Config file"] == str(cfg.resolve())
    assert rows["Config file sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert rows["Command line"] == "batchwbc run '/slides/night 1' --out r.xlsx"  # quoted: it can be re-run
    assert platform.python_version() in rows["Python version"]
    assert rows["onnxruntime version"][0].isdigit()
    assert rows["Host"] and rows["User"] and rows["Operating system"]


def test_no_config_and_an_unreadable_config_never_fail(tmp_path):
    assert provenance_rows(None, ["x"])["Config file"] == "none (built-in defaults)"
    assert file_sha256(tmp_path / "gone.toml").startswith("unknown (")
    assert command_line(["a", "b c"]) == "a 'b c'"
