"""qattune.generation"""
