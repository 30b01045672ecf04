"""higgs_tune.train"""
