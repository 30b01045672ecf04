"""higgs_tune.data"""
