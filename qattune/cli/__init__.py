"""qattune.cli"""
