# Types for the compiled build of deadlines.py (Cython's pure-Python mode): see
# mplb/compiled.py.  The .py file is the source either way.
cdef class Wheel:
    cdef public dict slots
    cdef public long long last
    cdef public object timer
    cdef public object loop
    cpdef arm(self, item, double deadline)
    cpdef disarm(self, item)
    cdef _start(self)
