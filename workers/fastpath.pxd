# Types for the compiled build of fastpath.py (Cython's pure-Python mode): see
# mplb/compiled.py.  The .py file is the source either way; the callbacks the loop calls
# stay Python methods, the steps between them are C calls.
cdef class Lane:
    cdef public object acceptor, worker, conn, raw, watcher
    cdef public int waiting
    cdef public double deadline
    cdef public long long tick
    cdef public object exchange, request, upstream, response
    cdef public Py_ssize_t received, remaining, sent
    cdef public bint keep_client, closed
    cdef public object tail
    cdef object __weakref__

    cdef wait_for_request(self)
    cdef _on_client_readable(self)
    cpdef dispatch(self)
    cdef start_exchange(self, exchange, request)
    cdef _on_upstream_readable(self)
    cdef head_arrived(self, response)
    cdef relay_body(self, data)
    cdef send_to_client(self, data)
    cdef _on_client_writable(self)
    cdef sent_all(self)
    cdef upstream_in_greenlet(self, failure=*, bint head=*)
    cdef escalate(self, step)
    cdef _timed_out(self)
    cdef crashed(self)
    cdef client_gone(self)
    cpdef close(self)
    cpdef move(self)
    cpdef bint idle(self)
