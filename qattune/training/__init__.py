"""qattune.training"""
