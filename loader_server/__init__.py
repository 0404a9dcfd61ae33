"""npyloader server: index .npy datasets, read and augment them in worker processes, serve batches."""

# The one place the version is written: setuptools reads it for the package metadata
# ([tool.setuptools.dynamic] in pyproject.toml) and `npyloader --version` prints it.
__version__ = "0.1.0"
