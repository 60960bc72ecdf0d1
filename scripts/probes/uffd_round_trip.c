// The bare cost of a userfaultfd round trip on this machine: a thread writes 4000 holes
// of a region registered for missing faults, and a handler thread resolves each with
// UFFDIO_COPY. Prints the first write's latency (µs) at p50, p90, p99 and max, and how
// many of the writes ran on another CPU than the one before.
//
//   cc -O2 -pthread scripts/probes/uffd_round_trip.c -o /tmp/uffd_round_trip
//   /tmp/uffd_round_trip [SPIN_US [APP_CPU [HANDLER_CPU [IDLE [FOLLOW [AWAKE]]]]]]
//
// SPIN_US: the handler polls this long before it sleeps (0: it sleeps at once); APP_CPU,
// HANDLER_CPU: pin the writer and the handler (-1: the scheduler chooses). IDLE=1: the
// handler turns SCHED_IDLE for the copy that wakes the writer, so that the scheduler counts
// its CPU as idle and wakes the writer there, and turns back to SCHED_OTHER when it runs
// again (needs CAP_SYS_NICE to turn back). FOLLOW=1: before it sleeps, the handler pins
// itself to the CPU the writer last ran on (the writer publishes it after every write: the
// best any following can know). AWAKE=1: a thread pinned to each CPU spins at SCHED_IDLE
// while the writes run, so that no vCPU halts (any other thread preempts it at once);
// AWAKE=2: the same at nice 19 under SCHED_OTHER, so that the scheduler sees no idle CPU
// to wake the writer on. As root (or with vm.unprivileged_userfaultfd=1).
// samepage's fault handler is this round trip plus its bookkeeping (BENCHMARKS.md, "first
// write").
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
static int uffd; static char *src; static int spin_us; static int hcpu=-1, idle, follow, awake;
static volatile int done;
static volatile int writer_cpu=-1; static int policy_errors;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static void pin(int cpu){cpu_set_t s;CPU_ZERO(&s);CPU_SET(cpu,&s);sched_setaffinity(0,sizeof s,&s);}
static void policy(int p){struct sched_param sp={0}; if(sched_setscheduler(0,p,&sp)) policy_errors++;}
static void *handler(void*a){
  if(hcpu>=0) pin(hcpu);
  int pinned=hcpu;
  struct pollfd p={uffd,POLLIN,0};
  for(;;){
    if(follow && poll(&p,1,0)==0 && writer_cpu>=0 && writer_cpu!=pinned){pinned=writer_cpu; pin(pinned);}
    if(spin_us){double t0=now(); int r; while((r=poll(&p,1,0))==0 && now()-t0<spin_us); if(r==0) poll(&p,1,-1);}
    else poll(&p,1,-1);
    struct uffd_msg m; if(read(uffd,&m,sizeof m)!=sizeof m) continue;
    if(m.event!=UFFD_EVENT_PAGEFAULT) continue;
    struct uffdio_copy c={.dst=m.arg.pagefault.address&~4095UL,.src=(unsigned long)src,.len=4096,.mode=0};
    if(idle) policy(SCHED_IDLE);
    ioctl(uffd,UFFDIO_COPY,&c);
    if(idle) policy(SCHED_OTHER);
  }
  return 0;
}
static void *spinner(void*a){
  pin((int)(long)a);
  if(awake==1) policy(SCHED_IDLE); else if(setpriority(PRIO_PROCESS,0,19)) policy_errors++;
  while(!done) __builtin_ia32_pause();
  return 0;
}
static int cmp(const void*a,const void*b){double x=*(const double*)a,y=*(const double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  spin_us=argc>1?atoi(argv[1]):0; int acpu=argc>2?atoi(argv[2]):-1; hcpu=argc>3?atoi(argv[3]):-1;
  idle=argc>4?atoi(argv[4]):0; follow=argc>5?atoi(argv[5]):0; awake=argc>6?atoi(argv[6]):0;
  int n=4000;
  uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  if(uffd<0){perror("userfaultfd (run as root, or set vm.unprivileged_userfaultfd=1)");return 1;}
  struct uffdio_api api={.api=UFFD_API};
  if(ioctl(uffd,UFFDIO_API,&api)){perror("UFFDIO_API");return 1;}
  src=mmap(0,4096,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  char*mem=mmap(0,(size_t)n*4096,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  if(src==MAP_FAILED||mem==MAP_FAILED){perror("mmap");return 1;}
  memset(src,7,4096);
  struct uffdio_register r={.range={(unsigned long)mem,(size_t)n*4096},.mode=UFFDIO_REGISTER_MODE_MISSING};
  if(ioctl(uffd,UFFDIO_REGISTER,&r)){perror("UFFDIO_REGISTER");return 1;}
  if(acpu>=0) pin(acpu);
  pthread_t t; pthread_create(&t,0,handler,0);
  if(awake) for(long c=0;c<sysconf(_SC_NPROCESSORS_ONLN);c++){pthread_t s; pthread_create(&s,0,spinner,(void*)c);}
  usleep(10000);
  double *l=malloc(n*sizeof(double)); int moves=0, last=-1;
  for(int i=0;i<n;i++){
    double t0=now(); mem[(size_t)i*4096+8]=1; l[i]=now()-t0;
    int c=sched_getcpu(); moves+=last>=0&&c!=last; last=c; writer_cpu=c;
  }
  done=1;
  qsort(l,n,sizeof(double),cmp);
  printf("spin=%d app=%d h=%d idle=%d follow=%d awake=%d p50 %.1f p90 %.1f p99 %.1f max %.1f moves %d%s\n",
         spin_us,acpu,hcpu,idle,follow,awake,l[n/2],l[n*9/10],l[n*99/100],l[n-1],moves,
         policy_errors?" (scheduling policy refused: not measured)":"");
  return 0;
}
