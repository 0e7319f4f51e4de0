"""Graph passes over the joint forward+backward graph, one job per module."""
