"""Example handler modules for the example organism (organism.yaml)."""
