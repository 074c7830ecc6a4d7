"""The pages: what each executed notebook shows, drawn from what its stage wrote.

The stages (``gsclip_lib.stages``) compute and write numbers; a page reads them back, draws the
figures, formats the tables and writes the words, every number in them generated from this run's
files with its interval or test (``gsclip_lib.evaluation.statistics``). One module per notebook,
named like its stage; :class:`gsclip_lib.pages.frame.Page` shows and saves what a module builds.
Because nothing here fits or trains, an edit to a figure or a sentence reruns only the pages.
"""
