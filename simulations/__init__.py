"""paychan.simulations"""
