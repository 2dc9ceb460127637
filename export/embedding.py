"""`python -m export.embedding IN.onnx --out OUT.onnx`: give an existing batchwbc model its
embedding output (the input of its last layer), which `batchwbc adapt` needs.

TensorFlow-free (the `onnx` package only), so it also runs on a lab PC with the runtime
install. The probabilities are unchanged: the existing tensor is only renamed and exposed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_in", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write (may be MODEL_IN itself).")
def main(model_in: Path, out: Path) -> None:
    """Add the embedding output to MODEL_IN and write the result to --out."""
    import onnx

    from batchwbc.engine.onnx_graph import EMBEDDING_OUTPUT, GraphError, add_embedding_output, find_head

    try:
        model = onnx.load(str(model_in))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a bad file
        click.echo(f"error: {model_in} is not a readable ONNX file ({type(exc).__name__}).", err=True)
        sys.exit(2)
    try:
        updated = add_embedding_output(model)
    except GraphError as exc:
        click.echo(f"error: {model_in.name}: {exc}", err=True)
        sys.exit(2)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(updated, str(tmp))
    tmp.replace(out)
    head = find_head(updated)
    click.echo(f"wrote {out}: output {EMBEDDING_OUTPUT!r} = input of the last layer, {head.dim} values per crop")


if __name__ == "__main__":
    main()
