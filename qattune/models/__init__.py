"""qattune.models"""
