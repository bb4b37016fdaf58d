"""``fastmbv1 bench``: where the time goes, measured (the package is ``measure`` so that it
is not mistaken for the repository's ``bench/`` folder of scripts and results).

``timings`` times the parts (loaders, the training step, an epoch split into data wait and
compute, the budget that follows); ``plots`` draws them; ``report`` draws training runs'
accuracy against time; ``cli`` is the command line. Nothing is imported here, so building
the parser stays cheap.
"""
