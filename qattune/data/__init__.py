"""qattune.data"""
