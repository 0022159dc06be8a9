# Types for the compiled build of responsehead.py (Cython's pure-Python mode): see
# mplb/compiled.py.  httptools calls the on_* methods; they stay Python methods.
cdef class ResponseHead:
    cdef public object parser
    cdef public int status
    cdef public bytes status_text
    cdef public bint headers_done, complete, parsed, keep_alive, chunked
    cdef public object content_length, connection_named, upgrade
    cdef public list headers, lines, body
    cpdef reset(self)
