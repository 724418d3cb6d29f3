"""lcq.models"""
