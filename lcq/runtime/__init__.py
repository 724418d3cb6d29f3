"""lcq.runtime"""
