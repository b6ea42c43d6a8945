"""dispatcher"""
