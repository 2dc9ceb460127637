"""Experiments: questions about trained runs that no single run answers.

Why a package: deciding what to try next for accuracy and robustness (ADRs 0005-0007) needed
evidence, not training curves - is the model under-fitting its own training set in evaluation
mode, would averaging sibling runs' weights, test-time views, an ensemble or re-weighted
classes help, does it depend on the framing margin, does it recognise blasts by the scanner.
Each question is one small module with one click command, registered in `cli.py`; all of them
load and decode split rows and predict through `train.evalkit`, and judge models only by
evaluation-mode predictions. `python -m train.experiments --help` lists them (the older
entry points `python -m train.diagnose` and `python -m train.probe` still work).

The product guard (`python -m train.robustness`) is not an experiment: tests hold the bundled
model to it.
"""
