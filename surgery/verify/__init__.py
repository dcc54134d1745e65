"""Proof that the function was kept: what is run (`schedule`), the rules that judge it (`rules`), and the one
path that runs and judges a schedule (`run`), for `surgery run` and `surgery verify` (`pair`) alike."""
