"""higgs_tune.model"""
