"""``fastmbv1 bench``: where the time goes, measured.

``measure`` times the parts (loaders, the training step, an epoch split into data wait and
compute, the budget that follows); ``report`` draws training runs' accuracy against time;
``cli`` is the command line. Nothing is imported here, so building the parser stays cheap.
"""
