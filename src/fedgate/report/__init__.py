"""The report for the hospital's data-protection officer: one self-contained HTML file."""
