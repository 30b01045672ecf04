"""Model families: the parts of the toolkit that differ between Higgs Audio v2 and v3."""
