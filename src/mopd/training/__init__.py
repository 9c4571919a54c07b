"""Training: building a run (`build`), one step in phases (`step`), its metrics, the loop
with evaluation and checkpoints (`trainer`), and several processes (`distributed`)."""
