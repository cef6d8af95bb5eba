"""qattune.quant"""
