"""lcq.server"""
