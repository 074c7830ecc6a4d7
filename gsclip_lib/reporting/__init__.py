"""Reporting: figures, the paper's numbers, Markdown tables, the zero-shot comparisons and their words,
the page checker and the HTML report. The pages (``gsclip_lib.pages``) use them."""
