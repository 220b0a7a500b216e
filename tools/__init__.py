"""Scripts: tiny offline model, vector generation, demo. Importable for tests."""
