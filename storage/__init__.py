"""paychan.storage"""
