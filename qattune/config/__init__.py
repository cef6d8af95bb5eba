"""qattune.config"""
