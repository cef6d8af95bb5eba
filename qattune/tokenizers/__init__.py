"""qattune.tokenizers"""
