"""WIDER FACE evaluation: the protocol (`protocol`), the official ground truth (`ground_truth`) and the
official prediction files (`prediction_files`)."""
