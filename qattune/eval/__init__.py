"""qattune.eval"""
