"""higgs_tune.infer"""
