"""Training of the tiny model's shipped weights (`src/samrepro/weights/`): `python -m tools.train_tiny --help`.

data.py makes the batches, loss.py the loss, loop.py trains, weights.py writes the weights and their provenance,
plot.py the training report, cli.py parses the options and runs it all.
"""
