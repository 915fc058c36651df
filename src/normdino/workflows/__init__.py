"""Whole runs as one call each, the same ones the command line makes: fit a model file, predict into a folder.

Evaluation runs (``evaluate``, ``bench``, ``reproduce``) live in :mod:`normdino.evaluation`; serving in
:mod:`normdino.serving`. Each workflow checks what it can before any work, runs under ``torchrun`` as well as in
one process (:mod:`normdino.torchrun`), and writes files through temporary files and renames.
"""
