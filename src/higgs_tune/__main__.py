"""`python -m higgs_tune` = the higgs-tune command."""

from higgs_tune.app.cli import main

main()
