"""Input pipeline: image folders, transforms, mask generators, sharding."""
