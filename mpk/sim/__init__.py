"""Discrete-event simulation of a compiled task graph on a GPU description.

``workload`` contains the simulator's input records, ``costs`` derives them from a task
graph, ``engine`` simulates the megakernel, ``models`` compares it with kernel-per-operator
execution and CUDA graphs, ``predict`` drives a whole model shape and ``trace`` writes the
simulated timelines for Perfetto.
"""
