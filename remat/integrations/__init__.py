"""Glue for the frameworks people train in, so that their own code needs none."""
