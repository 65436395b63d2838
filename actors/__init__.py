"""paychan.actors"""
