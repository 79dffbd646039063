"""The recipe: its schema and sections (pydantic), and the checks across sections."""
