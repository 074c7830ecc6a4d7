"""Reporting: figures, the paper's numbers, the results summary and the HTML report."""
