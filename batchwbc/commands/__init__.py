"""One module per command (run, verify, evaluate, adapt, info): each runs one options
object and returns an exit code; no click here (cli.py is the click layer).
"""
