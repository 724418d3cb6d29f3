"""lcq.quantizer"""
