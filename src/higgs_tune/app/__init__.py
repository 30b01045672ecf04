"""The application layer: the `higgs-tune` command line, the demo and the HTML report.

Only this layer parses command lines and prints for people; the library below raises typed
errors whose message says what to do (see docs/ARCHITECTURE.md).
"""
