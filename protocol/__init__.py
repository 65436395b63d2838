"""paychan.protocol"""
