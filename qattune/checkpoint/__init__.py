"""qattune.checkpoint"""
