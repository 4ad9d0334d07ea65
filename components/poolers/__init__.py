"""Token poolers: importing this package registers identity, pool1d and pool2d."""

from components.poolers import identity, pool1d, pool2d  # noqa: F401
